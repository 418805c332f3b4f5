"""Patient data in: `prefetch` holds a service's templates and what it gets back;
`prefetch_resolve` checks what the EHR sent against them and decides what is missing (the 412 is
decided there), `prefetch_values` whether a value can stand for a template's result and
`prefetch_fallback` the reads of what is missing. `fhir` holds the rules for reading the FHIR
server (which servers, where the token goes, typed errors), `fhir_client` the read-only client
and `read_budget` the deadline and byte caps one call's reads share. `jsonlimit` parses JSON from
outside (request bodies, FHIR answers) with a nesting limit."""
