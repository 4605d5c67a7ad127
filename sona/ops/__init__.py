"""What operators run beside the functions: the deploy plan, the webhook SQL, monitoring, stats."""
