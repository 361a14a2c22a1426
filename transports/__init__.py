"""Built-in transports, one per module. None imports another; each is loaded
lazily by ``alkpubsub.connect`` so optional clients (redis, nats) stay optional."""
