-- Files a model could not label, and why: the kind of reason (error_kind: gone,
-- permission, too_large, corrupt, decoder_crashed, ...) and its sentence (files found gone
-- since are left out).
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.error_kind, i.error, i.dicom_modality, i.labeled_at
FROM images i
WHERE i.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
  AND i.error IS NOT NULL
  AND i.missing_since IS NULL
ORDER BY i.error_kind, i.path;
