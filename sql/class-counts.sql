-- How many images each model put in each class, how many of those it flagged out of set
-- (counted apart: they are left out of the class's count and mean confidence), and how many
-- it could not read (files found gone are left out).
-- Parameters: none.
SELECT m.identity AS model,
       COALESCE(i.label, '(error)') AS label,
       SUM(CASE WHEN i.out_of_set IS TRUE THEN 0 ELSE 1 END) AS images,
       SUM(CASE WHEN i.out_of_set IS TRUE THEN 1 ELSE 0 END) AS out_of_set,
       ROUND(CAST(AVG(CASE WHEN i.out_of_set IS TRUE THEN NULL ELSE i.confidence END)
                  AS NUMERIC), 4) AS mean_confidence
FROM images i
JOIN models m ON m.id = i.model_id
WHERE i.missing_since IS NULL
GROUP BY m.identity, COALESCE(i.label, '(error)')
ORDER BY m.identity, images DESC, label;
