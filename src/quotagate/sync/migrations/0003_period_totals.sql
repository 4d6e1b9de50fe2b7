-- 0003_period_totals: usage per billing period (the org's anchor day, not the calendar).

-- The billing period an entry is attributed to, as its start date ("2026-11-15"; "2026-11"
-- when the org's anchor day was unknown): see sink.with_periods. '' for entries stored
-- before this migration.
ALTER TABLE ledger_entries ADD COLUMN period TEXT NOT NULL DEFAULT '';

-- Usage (charged minus refunded) per billing period, UTC day and every ListUsage
-- dimension (the day keeps day-aligned time ranges answerable from here). Updated in the
-- transaction that inserts the entries, only for entries actually inserted.
CREATE TABLE period_totals (
  org       TEXT NOT NULL,
  meter     TEXT NOT NULL,
  period    TEXT NOT NULL,
  day       TEXT NOT NULL,
  team      TEXT NOT NULL,
  seat      TEXT NOT NULL,
  assistant TEXT NOT NULL,
  action    TEXT NOT NULL,
  feature   TEXT NOT NULL,
  amount    BIGINT NOT NULL,
  PRIMARY KEY (org, meter, period, day, team, seat, assistant, action, feature)
);

-- Usage stored before: period '', so period_totals and the entries agree.
INSERT INTO period_totals (org, meter, period, day, team, seat, assistant, action, feature,
                           amount)
SELECT org, meter, '', day, team, seat, assistant, action, feature, amount FROM usage_totals;
