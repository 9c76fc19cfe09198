"""The relay's management plane: Azure's management API over the store (``arm_api``)."""
