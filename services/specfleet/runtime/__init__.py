"""What every service process shares: the gRPC server wrapper (auth, health, interceptors), starting a service
(`process.py`), security (tokens, TLS), telemetry, rate limits, wire conversions and streamed text. Imports only
`api/`, `engine/` and `state/`; the services, the SDK and everything above import it."""
