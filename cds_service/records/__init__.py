"""Records: what a call leaves behind. `call` is one call's record as it goes (audit fields,
cards issued, models scored) and as stored (`Call`); `audit` is the PHI-access record of each
call; `feedback` parses what the clinician did with a card; `suppression` hides a card overridden
recently. `store` is the durable SQLite/PostgreSQL storage (`Store`), on `tables` (the schema),
`database` (URL, engine, schema creation), `overrides` (card overrides and their lookup) and
`recorder` (the in-memory writer); `spool` is the local disk every call's records reach before
its answer leaves."""
