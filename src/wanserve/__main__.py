from wanserve.cli import main

main()
