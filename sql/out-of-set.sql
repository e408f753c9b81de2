-- Images a model flagged out of set (of none of its classes: a blank page, a photograph),
-- highest score first; they keep their label (NULL if scanned with --abstain) and are left
-- out of the other queries and the class averages.
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, i.runner_up, i.runner_up_probability, i.ood_score,
       i.dicom_modality, i.dicom_body_part, i.source_id
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.out_of_set
  AND i.missing_since IS NULL
ORDER BY i.ood_score DESC, i.path;
