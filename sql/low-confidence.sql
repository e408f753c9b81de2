-- Images to check by eye: labeled by a model, but with a confidence below :threshold, with the
-- runner-up class they were nearly given.
-- label_reviewed: what a person said (`modlabel review`; empty: none of the classes, or
-- no review), label_final: the review's label where there is one, else the model's.
-- Parameters: threshold (0..1; default 0.5),
--   model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, i.runner_up, i.runner_up_probability,
       i.out_of_set, i.ood_score, i.dicom_modality, i.source_id,
       r.label AS label_reviewed,
       CASE WHEN r.id IS NULL THEN i.label ELSE r.label END AS label_final
FROM images i
JOIN models m ON m.id = i.model_id
LEFT JOIN reviews r  -- the image's current review (store.reviews): its latest not undone
  ON r.path = i.path AND r.sha256 = i.sha256 AND r.undone_at IS NULL
 AND NOT EXISTS (SELECT 1 FROM reviews later
                 WHERE later.path = r.path AND later.sha256 = r.sha256
                   AND later.undone_at IS NULL AND later.id > r.id)
WHERE m.identity = :model
  AND i.label IS NOT NULL
  AND i.confidence < CAST(:threshold AS REAL)
  AND i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
ORDER BY i.label, i.confidence, i.path;
