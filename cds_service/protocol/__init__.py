"""CDS Hooks over HTTP: `views` are the endpoints (discovery, service calls, feedback, health);
`schemas` parse requests and describe responses at that boundary; `cards` builds the cards a
service answers with; `errors` is the exception hierarchy and `http` the one place an exception
becomes an OperationOutcome response; `swagger_ui` serves the /docs page's files."""
