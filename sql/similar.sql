-- The images most like the stored image at :path, by the cosine distance of their GAP
-- embeddings (modlabel_cosine_distance, on both databases), nearest first. Exact: it reads
-- every embedding of the model, so `modlabel similar` is the fast way at scale. Files found
-- gone, error rows and images flagged out of set are left out, and so is the image itself.
-- label_reviewed: what a person said (`modlabel review`; empty: none of the classes, or
-- no review), label_final: the review's label where there is one, else the model's.
-- Parameters: path (a stored image's path), limit (how many; default 20),
--   model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.label, i.confidence, i.out_of_set,
       modlabel_cosine_distance(i.embedding, q.embedding) AS distance,
       r.label AS label_reviewed,
       CASE WHEN r.id IS NULL THEN i.label ELSE r.label END AS label_final
FROM images q
JOIN models m ON m.id = q.model_id
JOIN images i ON i.model_id = q.model_id
LEFT JOIN reviews r  -- the image's current review (store.reviews): its latest not undone
  ON r.path = i.path AND r.sha256 = i.sha256 AND r.undone_at IS NULL
 AND NOT EXISTS (SELECT 1 FROM reviews later
                 WHERE later.path = r.path AND later.sha256 = r.sha256
                   AND later.undone_at IS NULL AND later.id > r.id)
WHERE m.identity = :model
  AND q.path = :path
  AND i.id <> q.id
  AND i.embedding IS NOT NULL
  AND i.missing_since IS NULL
  AND i.error IS NULL
  AND i.out_of_set IS NOT TRUE
ORDER BY distance, i.path
LIMIT CAST(:limit AS INTEGER);
