-- Images that two models labeled differently (e.g. last month's model and tonight's);
-- images either model flagged out of set are left out.
-- Parameters: model_a (an identity or a prefix of one, as class-counts lists them),
--   model_b (the other model, likewise).
SELECT a.path, a.label AS label_a, a.confidence AS confidence_a,
       b.label AS label_b, b.confidence AS confidence_b
FROM images a
JOIN images b ON b.path = a.path
-- The models as values, not joined tables: each side is then the rows of one model in path
-- order, and the two merge without a hash or a sort of a million rows.
WHERE a.model_id = (SELECT ma.id FROM models ma WHERE ma.identity = :model_a)
  AND b.model_id = (SELECT mb.id FROM models mb WHERE mb.identity = :model_b)
  AND a.label <> b.label
  AND a.missing_since IS NULL
  AND a.out_of_set IS NOT TRUE
  AND b.out_of_set IS NOT TRUE
ORDER BY a.path;
