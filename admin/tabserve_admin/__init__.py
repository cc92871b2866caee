"""`tabserve-admin`: the operator's and auditor's command (installed with the server, not with the light client)."""
