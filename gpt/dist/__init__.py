"""The process group a rank joins, its collectives, and the random number generators it draws from."""
