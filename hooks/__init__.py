"""The CDS services this deployment can offer, in discovery order.

One module per service; a site enables a subset in its `site_config/*.yaml`. Add a service by
writing its module and listing it here: there is no import scanning.
"""

from hooks import kidney_risk, nephrotoxic_order_check

SERVICES = (
    kidney_risk.SERVICE,
    nephrotoxic_order_check.SERVICE,
)
