"""Ray side of privatelora (installed as privatelora.placement)."""
