-- How many images each model put in each class, how many more it labeled so but flagged out
-- of set (counted apart: they are left out of the class's count and mean confidence), and how many
-- it could not read (files found gone are left out).
-- Parameters: none.
SELECT m.identity AS model,
       COALESCE(c.label, '(error)') AS label,
       c.images,
       c.out_of_set,
       c.mean_confidence
FROM (
  SELECT i.model_id,
         i.label,
         SUM(CASE WHEN i.out_of_set IS TRUE THEN 0 ELSE 1 END) AS images,
         SUM(CASE WHEN i.out_of_set IS TRUE THEN 1 ELSE 0 END) AS out_of_set,
         ROUND(CAST(AVG(CASE WHEN i.out_of_set IS TRUE THEN NULL ELSE i.confidence END)
                    AS NUMERIC), 4) AS mean_confidence
  FROM images i
  WHERE i.missing_since IS NULL
  GROUP BY i.model_id, i.label
) c
JOIN models m ON m.id = c.model_id
ORDER BY m.identity, c.images DESC, label;
