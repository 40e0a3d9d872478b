"""Operator side: FEDn network, clients, sessions, round log, synthetic clinics."""
