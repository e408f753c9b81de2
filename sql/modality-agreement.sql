-- DICOM images whose predicted label disagrees with their header's Modality (0008,0060),
-- by the mapping below: a wrong label, or a mislabeled header, to check by eye.
-- Mapping (Modality codes -> class): CT -> abdominal_ct; MR -> brain_mri; US -> ultrasound;
-- CR, DX, DR -> chest_xray; OP, OPT -> retinal_funduscopy; SM, GM, XC -> fluorescence_microscopy.
-- Images whose Modality is not in the mapping (XA, MG, NM, PT, OT, ...), files that are not
-- DICOM and files that could not be labeled are left out; images flagged out of set are
-- listed, with the flag (a flagged image's label is least to be trusted).
-- Edit the VALUES list to change the mapping.
-- label_reviewed: what a person said (`modlabel review`; empty: none of the classes, or
-- no review), label_final: the review's label where there is one, else the model's.
-- Parameters: model (identity; default: the newest).
WITH expected (modality, label) AS (
  VALUES ('CT', 'abdominal_ct'),
         ('MR', 'brain_mri'),
         ('US', 'ultrasound'),
         ('CR', 'chest_xray'),
         ('DX', 'chest_xray'),
         ('DR', 'chest_xray'),
         ('OP', 'retinal_funduscopy'),
         ('OPT', 'retinal_funduscopy'),
         ('SM', 'fluorescence_microscopy'),
         ('GM', 'fluorescence_microscopy'),
         ('XC', 'fluorescence_microscopy')
)
SELECT i.path, i.dicom_modality, i.dicom_body_part, e.label AS expected_label,
       i.label, i.confidence, i.runner_up, i.runner_up_probability, i.out_of_set, i.ood_score,
       r.label AS label_reviewed,
       CASE WHEN r.id IS NULL THEN i.label ELSE r.label END AS label_final
FROM images i
JOIN expected e ON e.modality = UPPER(i.dicom_modality)
LEFT JOIN reviews r  -- the image's current review (store.reviews): its latest not undone
  ON r.path = i.path AND r.sha256 = i.sha256 AND r.undone_at IS NULL
 AND NOT EXISTS (SELECT 1 FROM reviews later
                 WHERE later.path = r.path AND later.sha256 = r.sha256
                   AND later.undone_at IS NULL AND later.id > r.id)
WHERE i.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
  AND i.label IS NOT NULL
  AND i.label <> e.label
  AND i.missing_since IS NULL
ORDER BY i.dicom_modality, i.label, i.path;
