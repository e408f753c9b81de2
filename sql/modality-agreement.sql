-- DICOM images whose predicted label disagrees with their header's Modality (0008,0060),
-- by the mapping below: a wrong label, or a mislabeled header, to check by eye.
-- Mapping (Modality codes -> class): CT -> abdominal_ct; MR -> brain_mri; US -> ultrasound;
-- CR, DX, DR -> chest_xray; OP, OPT -> retinal_funduscopy; SM, GM, XC -> fluorescence_microscopy.
-- Images whose Modality is not in the mapping (XA, MG, NM, PT, OT, ...), files that are not
-- DICOM and files that could not be labeled are left out; images flagged out of set are
-- listed, with the flag (a flagged image's label is least to be trusted).
-- Edit the VALUES list to change the mapping.
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
       i.label, i.confidence, i.runner_up, i.runner_up_probability, i.out_of_set, i.ood_score
FROM images i
JOIN expected e ON e.modality = UPPER(i.dicom_modality)
WHERE i.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
  AND i.label IS NOT NULL
  AND i.label <> e.label
  AND i.missing_since IS NULL
ORDER BY i.dicom_modality, i.label, i.path;
