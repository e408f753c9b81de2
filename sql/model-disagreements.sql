-- Images that two models labeled differently (e.g. last month's model and tonight's);
-- images either model flagged out of set are left out.
-- Parameters: model_a (an identity or a prefix of one, as class-counts lists them),
--   model_b (the other model, likewise).
SELECT a.path, a.label AS label_a, a.confidence AS confidence_a,
       b.label AS label_b, b.confidence AS confidence_b
FROM images a
JOIN models ma ON ma.id = a.model_id AND ma.identity = :model_a
JOIN images b ON b.path = a.path
JOIN models mb ON mb.id = b.model_id AND mb.identity = :model_b
WHERE a.label <> b.label
  AND a.missing_since IS NULL
  AND a.out_of_set IS NOT TRUE
  AND b.out_of_set IS NOT TRUE
ORDER BY a.path;
