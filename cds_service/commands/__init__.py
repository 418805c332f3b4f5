"""The handlers of the `cds-service` command, one module per command group; `cds_service.cli`
builds the parser and points each subcommand here. A handler takes the parsed arguments and
returns the exit status; it imports what it runs when it runs, so `--help` stays fast.

`service` (serve, reload, check-config), `invoke`, `site` (site check), `audit` (show, purge),
`suppressions` (list, clear), `models` (generate-cohort, train, evaluate, validate, explain),
`data` (export); `stored` is what audit and suppressions share: opening the store, printing its
rows."""
