-- Snapshots of resolved holds are pruned once Redis has dropped them too (the syncer's
-- housekeeping): this index keeps that DELETE from scanning every snapshot.
CREATE INDEX state_snapshots_kind_updated ON state_snapshots (kind, updated_at);
