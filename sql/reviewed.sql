-- The images people reviewed (`modlabel review`), latest review first: the model's label
-- beside the reviewed one (label_reviewed; empty: none of the classes), label_final (the
-- review's), who reviewed and when, the queue that chose the image (strategy) and the note.
-- A review belongs to the file's content (its path and SHA-256), not to a model's row: it
-- holds for every model and through rescans and prunes. An undone review is left out (the
-- one before it, if any, shows); files found gone are left out.
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, r.label AS label_reviewed, r.label AS label_final,
       r.reviewer AS reviewed_by, r.reviewed_at, r.strategy, r.note,
       i.out_of_set, i.dicom_modality
FROM reviews r
JOIN images i ON i.path = r.path AND i.sha256 = r.sha256
 AND i.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
WHERE r.undone_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM reviews later
                  WHERE later.path = r.path AND later.sha256 = r.sha256
                    AND later.undone_at IS NULL AND later.id > r.id)
  AND i.missing_since IS NULL
ORDER BY r.reviewed_at DESC, r.id DESC;
