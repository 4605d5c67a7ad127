"""The three HTTP doors, one module each by who may reach it: public (the webhook, from the
internet), worker (Cloud Tasks only), scheduler (Cloud Scheduler only); http holds what they share."""
