"""Trust: who may call us. The EHR's JWT is verified in `auth` (issuers, JWK Set cache, claims);
`replay` remembers each token's `jti` until it expires; `devkeys` makes the demo site's
development key pair. Nothing here knows a clinical service."""
