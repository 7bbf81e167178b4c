"""The verifier service: the target model behind `specfleet.api.v1.Verifier`."""
