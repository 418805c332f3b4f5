"""Risk models: a model is a directory with a manifest (`manifest`) and a skops artifact checked
against it (`artifact`); our estimators (`estimators`), their one-row scoring (`fast`) and
explanations (`explain`); `loaded` is the worker's `ModelSet`, loaded once at start-up, and
`binding` a site's model for one service during one request."""
