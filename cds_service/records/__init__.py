"""Records: what a call leaves behind. `call` is one call's record as it goes (audit fields,
cards issued, models scored); `audit` is the PHI-access record of each call; `feedback`
parses what the clinician did with a card; `suppression` hides a card overridden recently; `store`
is the durable SQLite/PostgreSQL storage and `spool` the local disk every call's records reach
before its answer leaves."""
