"""One module per paper experiment: ``python -m superscopes.recipes.NAME`` (``python -m recipes.NAME``
in a checkout) or ``superscopes recipe NAME``."""

RECIPES = (
    "superscopes_mlp_outputs",
    "superscopes_hidden_states",
    "superscopes_evaluation",
    "token_identity",
    "attribute_extraction",
    "entity_description",
    "cross_model",
    "multihop",
    "verbalization_controls",
    "inverse_scope",
    "sae_self_explanation",
)
