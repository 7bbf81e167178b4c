"""The drafter service: one drafter pool (a model, or suffix / n-gram lookup) behind `specfleet.api.v1.Drafter`."""
