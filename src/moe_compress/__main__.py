from moe_compress.cli import main

main()
