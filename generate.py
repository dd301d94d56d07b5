"""Sample text from a language model (AWD-LSTM's generate.py); the same as generate_rmc.py.

    python generate.py --checkpoint runs/main-20261121-101500 --words 1000 --temperature 1.0 --outf generated.txt
"""

import generate_rmc
import training

build_parser = generate_rmc.build_parser
main = generate_rmc.main

if __name__ == "__main__":
    training.cli(main)
