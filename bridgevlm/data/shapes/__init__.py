"""The Shapes world: a synthetic, seeded world of coloured shapes on a 3×3 grid."""
from .families import FAMILIES, HELD_IN, HELD_OUT
from .scene import Scene, detailed_caption, short_caption
from .world import WorldConfig, build_world, text_conversations

__all__ = ["FAMILIES", "HELD_IN", "HELD_OUT", "Scene", "WorldConfig", "build_world", "detailed_caption",
           "short_caption", "text_conversations"]
