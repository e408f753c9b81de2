-- How many images each model put in each class, and how many it could not read
-- (files found gone and images flagged out of set are left out).
-- Parameters: none.
SELECT m.identity AS model,
       COALESCE(i.label, '(error)') AS label,
       COUNT(*) AS images,
       ROUND(CAST(AVG(i.confidence) AS NUMERIC), 4) AS mean_confidence
FROM images i
JOIN models m ON m.id = i.model_id
WHERE i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
GROUP BY m.identity, COALESCE(i.label, '(error)')
ORDER BY m.identity, images DESC;
