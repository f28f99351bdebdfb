"""The project's one colour palette: Okabe & Ito's eight colours.

They stay distinguishable under the common colour-vision deficiencies and in
grey-scale print, so every plot and picture of the project draws from here
instead of keeping its own copy.
"""

BLACK = "#000000"
ORANGE = "#E69F00"
SKY_BLUE = "#56B4E9"
BLUISH_GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
REDDISH_PURPLE = "#CC79A7"

#: The order series take when several share a plot: the strongest contrasts first,
#: yellow (weak on white) and black (the colour of axes and text) last.
OKABE_ITO = (BLUE, ORANGE, BLUISH_GREEN, REDDISH_PURPLE, SKY_BLUE, VERMILLION, YELLOW, BLACK)
