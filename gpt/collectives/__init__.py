"""The process group a rank joins and leaves, and the collectives the project runs beside training."""
