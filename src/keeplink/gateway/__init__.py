"""The keeplink gateway daemon: config, runtime, HTTP/WebSocket API, dashboard."""

from keeplink.gateway.config import DeviceConfig, GatewayConfig, load_config, parse_config
from keeplink.gateway.runtime import Gateway

__all__ = ["DeviceConfig", "Gateway", "GatewayConfig", "load_config", "parse_config"]
