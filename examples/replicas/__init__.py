"""Several broker replicas on one PostgreSQL: the docker-compose example and a loopback script."""
