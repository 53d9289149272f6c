"""The ZeroMQ backend server: router (clients), scheduler (fair bounded queue), workers, auth."""
