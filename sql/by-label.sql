-- Retrieval: the images labeled :label with a confidence of at least :min_confidence,
-- most confident first.
-- Parameters: label (a class name), min_confidence (0..1).
SELECT i.path, i.confidence, i.width, i.height, m.identity AS model, i.labeled_at
FROM images i
JOIN models m ON m.id = i.model_id
WHERE i.label = :label
  AND i.confidence >= CAST(:min_confidence AS REAL)
ORDER BY i.confidence DESC, i.path;
