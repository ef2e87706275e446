from caldera.cli import main

main()
