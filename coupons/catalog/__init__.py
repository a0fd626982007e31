"""Step 1 of the method: batches created at the platform on demand and synced to our
ledger (`catalog.batches`), and the campaigns that hand them out (`catalog.campaigns`).

The domain over `coupons.ledger.batches` and `coupons.ledger.campaigns` (their SQL): a
caller imports the package, `from coupons import catalog`, and names the module at the call
(`catalog.batches.create_batch`, `catalog.campaigns.create_campaign`), so a call reads apart
from the ledger's own (`batches.get_batch`). The records they take and give (`Batch`,
`Campaign`, `CampaignSpec`, `Task`) are the ledger's.
"""

from coupons.catalog import batches, campaigns

__all__ = ["batches", "campaigns"]
