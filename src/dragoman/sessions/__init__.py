"""The session plane: one actor per client session."""
