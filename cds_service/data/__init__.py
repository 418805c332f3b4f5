"""Patient data in: `prefetch` checks what the EHR sent against a service's templates and decides
what is missing (the 412 is decided there); `fhir` is the read-only FHIR client that fetches it;
`jsonlimit` parses JSON from outside (request bodies, FHIR answers) with a nesting limit."""
