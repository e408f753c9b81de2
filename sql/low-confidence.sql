-- Images to check by eye: labeled by a model, but with a confidence below :threshold, with the
-- runner-up class they were nearly given.
-- Parameters: threshold (0..1; default 0.5),
--   model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, i.runner_up, i.runner_up_probability,
       i.out_of_set, i.ood_score, i.dicom_modality, i.source_id
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.label IS NOT NULL
  AND i.confidence < CAST(:threshold AS REAL)
  AND i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
ORDER BY i.label, i.confidence, i.path;
