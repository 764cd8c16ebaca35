"""NextStep decoder, flow head and shared layers."""
