"""One job's life: what its row asks for, the run from claim to completion, and reclaiming lost jobs."""
