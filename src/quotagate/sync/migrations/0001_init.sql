-- 0001_init: the durable ledger. Dialect-neutral: runs on SQLite and PostgreSQL.
-- Statements are separated by ';' at the end of a line.

-- Every ledger stream entry, once: entry_id = '<shard>-<stream id>', so a re-delivered
-- batch inserts nothing twice. Ids are stored unescaped (raw). `net` is the entry's
-- contribution to usage: +amount for commit, -amount for refund, 0 otherwise.
CREATE TABLE ledger_entries (
  entry_id  TEXT PRIMARY KEY,
  shard     INTEGER NOT NULL,
  stream_id TEXT NOT NULL,
  type      TEXT NOT NULL,
  rid       TEXT NOT NULL DEFAULT '',
  org       TEXT NOT NULL DEFAULT '',
  team      TEXT NOT NULL DEFAULT '',
  seat      TEXT NOT NULL DEFAULT '',
  assistant TEXT NOT NULL DEFAULT '',
  meter     TEXT NOT NULL DEFAULT '',
  action    TEXT NOT NULL DEFAULT '',
  feature   TEXT NOT NULL DEFAULT '',
  amount    BIGINT NOT NULL DEFAULT 0,
  net       BIGINT NOT NULL DEFAULT 0,
  at_ms     BIGINT NOT NULL DEFAULT 0,
  day       TEXT NOT NULL DEFAULT '',
  raw       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX ledger_entries_org_at ON ledger_entries (org, at_ms);
CREATE INDEX ledger_entries_rid ON ledger_entries (rid);

-- Usage (charged minus refunded) per UTC day and every ListUsage dimension. Updated in
-- the transaction that inserts the entries, only for entries actually inserted.
CREATE TABLE usage_totals (
  org       TEXT NOT NULL,
  meter     TEXT NOT NULL,
  day       TEXT NOT NULL,
  team      TEXT NOT NULL,
  seat      TEXT NOT NULL,
  assistant TEXT NOT NULL,
  action    TEXT NOT NULL,
  feature   TEXT NOT NULL,
  amount    BIGINT NOT NULL,
  PRIMARY KEY (org, meter, day, team, seat, assistant, action, feature)
);

-- The last copy of each Redis hash an entry touched (org config, balances, purchases,
-- holds, plans): JSON object of the hash. `quotagate restore` writes them back.
CREATE TABLE state_snapshots (
  redis_key  TEXT PRIMARY KEY,
  org        TEXT NOT NULL DEFAULT '',
  kind       TEXT NOT NULL,
  data       TEXT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE INDEX state_snapshots_org ON state_snapshots (org);
