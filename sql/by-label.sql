-- The images a model labeled :label with a confidence of at least :min_confidence, most
-- confident first. Each comes with its runner-up class and its DICOM header; files found gone
-- and images flagged out of set are left out.
-- Parameters: label (a class name of the model), min_confidence (0..1; default 0),
--   model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, i.runner_up, i.runner_up_probability,
       i.out_of_set, i.ood_score, i.dicom_modality, i.dicom_body_part,
       i.width, i.height, i.source_id, i.labeled_at
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.label = :label
  AND i.confidence >= CAST(:min_confidence AS REAL)
  AND i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
ORDER BY i.confidence DESC, i.path;
