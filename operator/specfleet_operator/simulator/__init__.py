"""`specfleet simulate`: a discrete-event simulator of speculative-decoding fleets at 10 to 1,000 replicas.

Cost models (`costs`), arrival traces (`traces`), the five serving systems (`systems`), the vectorised event core
(`engine`), autoscaling-policy scoring (`autoscale`), tables and plots (`report`) and the command (`cli`)."""
