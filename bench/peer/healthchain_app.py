"""The benchmark's peer: a HealthChain 0.16.1 CDS Hooks service making one scikit-learn
prediction per call, served by uvicorn with uvloop and httptools, no authentication.

Runs only in the virtualenv `bench.peer.venv` builds (HealthChain, FastAPI, uvicorn are not
dependencies of this project):

    <venv>/bin/python -m bench.peer.healthchain_app --port 8002 [--workers 1]

`kidney-risk` (patient-view) reads the newest eGFR of the `egfr` prefetch searchset and the age
from the `patient` prefetch (constants when absent: HealthChain hands the handler the raw
prefetch dicts), scores them with a LogisticRegression fitted at start-up on fixed synthetic
data, and answers one card. Served at `/cds-services/<id>` like the bench's payloads
(HealthChain's default prefix is `/cds`); `/health` is HealthChain's own route.
"""

from __future__ import annotations

import argparse
from datetime import date

import numpy as np
from healthchain.gateway import CDSHooksService, HealthChainAPI
from healthchain.gateway.cds import CDSHooksConfig
from healthchain.models import Card, CDSRequest, CDSResponse
from sklearn.linear_model import LogisticRegression

SERVICE_ID = "kidney-risk"
DEFAULT_EGFR = 45.0
DEFAULT_AGE = 65.0
SOURCE = {"label": "HealthChain peer (bench)"}


def fit_model(seed: int = 20) -> LogisticRegression:
    """Risk rises as eGFR falls and age rises: 2,000 synthetic patients, a fixed seed."""
    rng = np.random.default_rng(seed)
    egfr = rng.uniform(5, 120, 2000)
    age = rng.uniform(20, 95, 2000)
    logit = -0.08 * (egfr - 30) + 0.03 * (age - 60) - 1.0
    outcome = rng.random(2000) < 1 / (1 + np.exp(-logit))
    return LogisticRegression().fit(np.column_stack([egfr, age]), outcome)


MODEL = fit_model()


def features(prefetch: dict | None) -> tuple[float, float]:
    prefetch = prefetch or {}
    egfr, age = DEFAULT_EGFR, DEFAULT_AGE
    entries = (prefetch.get("egfr") or {}).get("entry") or ()
    if entries:  # a searchset sorted -date: the first entry is the newest
        value = entries[0].get("resource", {}).get("valueQuantity", {}).get("value")
        if isinstance(value, int | float):
            egfr = float(value)
    born = (prefetch.get("patient") or {}).get("birthDate")
    if born:
        age = float(date.today().year - int(born[:4]))
    return egfr, age


def create_app() -> HealthChainAPI:
    app = HealthChainAPI(title="bench-peer")
    cds = CDSHooksService(config=CDSHooksConfig(base_path=""))

    @cds.hook("patient-view", id=SERVICE_ID)
    def kidney_risk(request: CDSRequest) -> CDSResponse:
        egfr, age = features(request.prefetch)
        risk = float(MODEL.predict_proba(np.array([[egfr, age]]))[0, 1])
        return CDSResponse(cards=[Card(
            summary=f"Kidney failure risk {risk:.0%} (eGFR {egfr:g}, age {age:.0f})",
            indicator="warning" if risk >= 0.2 else "info",
            detail=f"Logistic regression on eGFR {egfr:g} and age {age:.0f}: risk {risk:.1%}.",
            source=SOURCE)])

    app.register_service(cds)
    return app


app = create_app()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.peer.healthchain_app",
                                     description="HealthChain peer for bench.service_bench.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    # One worker: uvicorn serves in this process. More: a supervisor spawning that many
    # worker processes (multiprocessing spawn), which import the app by this name.
    uvicorn.run("bench.peer.healthchain_app:app" if args.workers > 1 else app,
                host=args.host, port=args.port, workers=args.workers, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
