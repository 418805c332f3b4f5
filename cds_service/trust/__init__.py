"""Trust: who may call us. The EHR's JWT is verified in `auth`, from the issuers in `issuers`, the
keys in `keys`, the JWK Set cache in `jwks` and the claim rules in `claims`; `site_issuers` reads
a site file's `issuers:` and `jwt:` sections; `replay` remembers each token's `jti` until it
expires; `devkeys` makes the demo site's development key pair. Nothing here knows a clinical
service."""
